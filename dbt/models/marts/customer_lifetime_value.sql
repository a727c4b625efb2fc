with users as (
    select * from {{ ref('stg_faker__users') }}
),

purchases as (
    select * from {{ ref('stg_faker__purchases') }}
),

products as (
    select * from {{ ref('stg_faker__products') }}
),

kept_purchases as (
    select
        purchases.user_id,
        purchases.purchased_at,
        products.price
    from purchases
    inner join products on purchases.product_id = products.product_id
    where purchases.is_purchased and not purchases.is_returned
),

per_user as (
    select
        user_id,
        count(*) as purchase_count,
        sum(price) as lifetime_value,
        min(purchased_at) as first_purchased_at,
        max(purchased_at) as last_purchased_at
    from kept_purchases
    group by user_id
),

final as (
    select
        users.user_id,
        users.user_name,
        users.email,
        coalesce(per_user.purchase_count, 0) as purchase_count,
        coalesce(per_user.lifetime_value, 0) as lifetime_value,
        per_user.first_purchased_at,
        per_user.last_purchased_at
    from users
    left join per_user on users.user_id = per_user.user_id
)

select * from final
