with source as (
    select * from {{ source('faker', 'users') }}
),

renamed as (
    select
        id as user_id,
        name as user_name,
        email,
        age,
        gender,
        nationality,
        occupation,
        created_at,
        updated_at,
        _airbyte_extracted_at as loaded_at
    from source
)

select * from renamed
