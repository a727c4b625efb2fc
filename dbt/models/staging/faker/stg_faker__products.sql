with source as (
    select * from {{ source('faker', 'products') }}
),

renamed as (
    select
        id as product_id,
        make,
        model,
        year as model_year,
        cast(price as decimal(18, 2)) as price,
        created_at,
        updated_at,
        _airbyte_extracted_at as loaded_at
    from source
)

select * from renamed
