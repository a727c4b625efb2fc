with source as (
    select * from {{ source('faker', 'purchases') }}
),

renamed as (
    select
        id as purchase_id,
        user_id,
        product_id,
        added_to_cart_at,
        purchased_at,
        returned_at,
        purchased_at is not null as is_purchased,
        returned_at is not null as is_returned,
        created_at,
        updated_at,
        _airbyte_extracted_at as loaded_at
    from source
)

select * from renamed
